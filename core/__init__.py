"""The ground floor: what every other package shares (settings, errors, reasons, URIs, task names,
the publisher protocol, the broker's contents and secret masking). It imports nothing else of
ours, so anything may import it; see scripts/layers and the layout table in the README."""
