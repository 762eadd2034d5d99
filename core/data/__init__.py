"""Data, buckets and caches: images and captions as found in folders, aspect-ratio buckets, the
order batches are drawn in, and the latent and text caches."""
