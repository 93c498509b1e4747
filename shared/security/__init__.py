"""Security primitives shared by every service: credentials, access control, and the mesh PKI."""
