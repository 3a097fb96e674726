"""torchrec_qr: compositional embedding-bag collections for TorchRec."""
