"""medasr: one module per DVC stage (fetch, subset, manifest, ...) plus the few shared modules they use."""
