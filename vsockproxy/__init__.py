"""vsockproxy: forward AF_VSOCK connections from an enclave to allowlisted TCP endpoints."""

__version__ = "1.0.0"
