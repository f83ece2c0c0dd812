"""Data: raw dataset sources (:mod:`.sources`; :mod:`.imagefolder` and :mod:`.wds_source` for images of any size)
-> webdataset shards (written by :mod:`.prepare` in the layout of :mod:`.layout`; read into memory by
:mod:`.shards` or streamed by :mod:`.stream`), and seeded per-view augmentation (:mod:`.views`)."""
