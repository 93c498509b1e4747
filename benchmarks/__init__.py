"""Benchmarks run by ``make bench``; figures go to ``benchmarks/results/`` (gitignored).

They measure the data paths in development mode (plaintext, no authentication) unless they say otherwise;
``benchmarks.security_cost`` measures what TLS and authentication add, against the same mesh insecure.
"""

import os

os.environ.setdefault("MAAS_INSECURE", "1")
