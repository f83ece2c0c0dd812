"""Data: raw dataset sources -> webdataset shards (:mod:`.shards`), and seeded per-view augmentation
(:mod:`.views`)."""
