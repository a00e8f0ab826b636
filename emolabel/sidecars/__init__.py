"""Sidecar files next to the photos: labels written where photo managers read them.

`xmp` merges emolabel's labels into an XMP sidecar (digiKam, Lightroom, darktable, exiftool)
without disturbing what other tools wrote there; `rdfxml` is its safe XML reader and the writer
that keeps each namespace's prefix; `write_back` takes a model version's stored labels image by
image to their sidecars (beside the images, under a mirror folder, or next to S3 objects).
"""
