"""KServe v2 / Open Inference Protocol helpers shared by the gateway and the inference workers.

``codec`` validates requests against a model signature (cheaply, on every request), decodes their tensors
and encodes responses; ``convert`` maps signatures, batching settings and model configs to and from their
protobuf forms; ``batching`` holds the resolved dynamic batching settings.
"""
