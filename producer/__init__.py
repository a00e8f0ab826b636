"""The producer: scans folders and S3 prefixes and hands chunks of image URIs to the queue.

The sources it scans (walking, listing, sniffing) are `core.storage`'s; what is here is the scan:
deciding what to send, chunking, and handing chunks to `db.outbox`. It imports only `core` and
`db`: never the worker's or training's code.

Nothing here imports TensorFlow, Keras or OpenCV: the producer runs on machines without them, and
a test imports it in a subprocess to keep it that way.
"""
