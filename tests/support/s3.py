"""The credentials and region of the test S3 server (moto; the `s3_endpoint` fixture)."""

from __future__ import annotations

S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"
