"""Reading images where they live: local folders and S3 buckets, one set of rules and reasons.

    sniff.py          an image's type from its first bytes
    entries.py        `Entry` (one listed file, usable or skipped) and the `Source` protocol
    local.py          one local file's bytes: confined to roots (workers) or not (datasets)
    walk.py           a folder tree, depth first in name order, without following links
    folder_source.py  `FolderSource`: a walked folder tree as entries
    s3.py             the boto3 client, object reads confined to a prefix, listing pages, heads
    s3_source.py      `S3Source`: an `s3://bucket/prefix` as entries
    sources.py        `open_source`: the source for a folder path or a URI
    reader.py         `Reader`: a `file://` or `s3://` URI's bytes, for a worker

Every problem is a `core.reasons.Reason`: a skipped entry's `skip_reason`, or the reason of the
`core.errors.ImageError` a read raises. Nothing here imports TensorFlow, OpenCV or, until an S3
location is used, boto3.
"""
