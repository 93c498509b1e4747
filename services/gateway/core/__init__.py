"""The gateway's domain core: endpoint table, version resolution, routing, holds, retries, load, control.

Never imports grpc, Ray or generated code: it works on request bytes and the small types of ``model``.
"""
