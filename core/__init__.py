"""The ground floor: what every other package shares (settings, errors, reasons, URIs, task names,
the publisher protocol, the broker's contents, secret masking, and `core.storage`: reading files,
buckets and their listings). It imports nothing else of ours, so anything may import it; see
.importlinter and the layout table in the README."""
