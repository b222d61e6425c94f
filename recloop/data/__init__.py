"""Data: readers of public formats, the synthetic generator, parallel preprocessing into a dataset
directory (vocabulary + CSR sequences + manifest), batches and splits."""
