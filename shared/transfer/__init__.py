"""KV cache transfer between workers (the bytes; the control messages are in shared.protocol)."""

from shared.transfer.base import KVTransport, TransferError, TransferStats, create_transport

__all__ = ["KVTransport", "TransferError", "TransferStats", "create_transport"]
