"""Every read and write of the ledger, the same on PostgreSQL and SQLite, one module per table
family; import from here (`from db.repository import X`), the modules are how it is kept.

    base            the tables, `NotFoundError`, row checks, batching under the parameter limit
    driver          the scan's hot writes through the driver: SQLite multi-row INSERTs of tuples,
                    PostgreSQL COPY into a staging table
    images          `images`: upsert by URI (which are new), ids for URIs
    jobs            `jobs`: create, status, chunk numbers and heartbeat, counts, end of a scan
    chunks          `chunks`: record before publishing, mark published, unfinished and open ones
    job_items       `job_items`, the ledger: rows in, failures out, `--where` and retry filters
    outcomes        a chunk's labels, faces and failures in one go (results + faces + ledger +
                    chunk)
    results         `results`, read: export (results, or the ledger's rows in any state with
                    their labels), already labeled, the latest label of an image
    faces           `faces`: a face model's rows (`FaceRow`, `NoFaceRow`), the photo's label,
                    replacing an image's faces, one row per face for export
    model_versions  `model_versions`, the registry: register, promote, roll back, list
    retrain_runs    `retrain_runs`: each retraining and its decision
    review_items    what the review page reads: a job's labels to judge (images or faces) with
                    filters, one page of them ranked by doubt in SQL, the job's per-class
                    thresholds, labels and versions, a thumbnail's source
    churn           label churn between two versions' results, the runs' recorded churn, the
                    archive images a run samples (URI and the root to read them under)
    reviews         `reviews`: people's verdicts, checked against the stored labels; the
                    human label of an image or face (its latest verdict)

Each function takes the session keyword-only and never commits, rolls back or closes it: the
caller owns the transaction (`with Session() as session, session.begin(): ...`). The hot paths
(`upsert_images`, `add_job_items`, `record_outcomes`, `labeled_fingerprints`) are bulk statements
(`INSERT ... ON CONFLICT`, `UPDATE ... WHERE ... IN`) cut into batches that stay under the
database's bound-parameter limit (SQLite's is the small one). An INSERT is one statement executed
with a list of rows (SQLAlchemy's "insertmanyvalues" still sends multi-row VALUES), so it is
compiled once and cached: `insert().values([...rows])` is never cached, and compiling its
thousands of parameters again for every batch cost the producer more than the database did.

Delivery is at least once, the effect exactly once: a redelivered chunk inserts no second result
(nor a second set of faces) and leaves every ledger row in the state it reached. A result, and a
face model's faces with it, is written again only for an image whose fingerprint changed since it
was labeled.

Rows come in as small frozen dataclasses (`ImageRow`, `JobItemRow`, `ChunkRow`, `ResultRow`,
`FaceRow`, `NoFaceRow`, `FailureRow`) that check themselves; bad input raises `ValueError`, an
unknown job or model raises `NotFoundError` (a `LookupError`).
"""

from db.repository.base import (
    MAX_ROWS_PER_STATEMENT,
    POSTGRESQL_MAX_PARAMETERS,
    NotFoundError,
)
from db.repository.chunks import (
    ChunkImage,
    ChunkRow,
    OpenChunk,
    mark_chunk_published,
    mark_chunks_published,
    open_chunks,
    pending_images,
    pending_uris,
    record_chunks,
    unfinished_chunks,
)
from db.repository.churn import (
    ArchiveImage,
    RecordedChurn,
    archive_images,
    changed_image_ids,
    label_pairs,
    labeled_image_ids,
    recorded_churn,
)
from db.repository.faces import (
    FaceExportRow,
    FaceRow,
    NoFaceRow,
    any_face_results,
    iter_face_rows,
)
from db.repository.images import (
    ImageRow,
    RecordedImages,
    image_ids_for_uris,
    record_images,
    upsert_images,
)
from db.repository.job_items import (
    FailedImage,
    FailedItem,
    JobItemRow,
    add_job_items,
    count_job_items,
    failed_and_unchanged,
    failed_images,
    failed_items,
    latest_outcome_failed,
    outcome_reasons,
    return_to_pending,
)
from db.repository.jobs import (
    TERMINAL_JOB_STATUSES,
    JobCounts,
    SilentScan,
    allocate_chunk_indices,
    create_job,
    end_scan,
    finish_job_if_complete,
    get_job,
    job_counts,
    job_summary,
    keep_job_summary,
    latest_jobs,
    reopen_job,
    set_job_status,
    silent_scans,
)
from db.repository.listings import (
    ListingRow,
    count_unread,
    record_listings,
    settled_listings,
    unread_counts,
)
from db.repository.model_versions import (
    active_model,
    get_model,
    list_models,
    previous_active_model,
    promote_if_active,
    register_model,
    set_active_model,
    set_model_hashes,
    set_model_status,
)
from db.repository.outcomes import (
    FailureRow,
    ResultRow,
    record_outcomes,
)
from db.repository.results import (
    ExportQuery,
    ExportRow,
    LedgerRow,
    iter_ledger_rows,
    iter_results,
    labeled_fingerprints,
    labeled_fingerprints_by_id,
    latest_confidence_below,
    latest_label_not_by,
    latest_uncertain,
    ledger_query,
    results_query,
)
from db.repository.retention import (
    PRUNE_BATCH_ROWS,
    PrunableJob,
    PrunedJob,
    prunable_jobs,
    prune_job,
)
from db.repository.retrain_runs import (
    record_retrain_run,
)
from db.repository.review_items import (
    ReviewFacets,
    ReviewFilters,
    ReviewItem,
    ReviewPage,
    ThumbnailSource,
    missing_items,
    ranked_review_items,
    review_facets,
    review_items,
    thumbnail_source,
)
from db.repository.reviews import (
    HumanLabel,
    ReviewError,
    ReviewInput,
    count_reviews,
    human_labels,
    model_classes,
    record_reviews,
)

__all__ = [
    "MAX_ROWS_PER_STATEMENT",
    "POSTGRESQL_MAX_PARAMETERS",
    "PRUNE_BATCH_ROWS",
    "TERMINAL_JOB_STATUSES",
    "ArchiveImage",
    "ChunkImage",
    "ChunkRow",
    "ExportQuery",
    "ExportRow",
    "FaceExportRow",
    "FaceRow",
    "FailedImage",
    "FailedItem",
    "FailureRow",
    "HumanLabel",
    "ImageRow",
    "JobCounts",
    "JobItemRow",
    "LedgerRow",
    "ListingRow",
    "NoFaceRow",
    "NotFoundError",
    "OpenChunk",
    "PrunableJob",
    "PrunedJob",
    "RecordedChurn",
    "RecordedImages",
    "ResultRow",
    "ReviewError",
    "ReviewFacets",
    "ReviewFilters",
    "ReviewInput",
    "ReviewItem",
    "ReviewPage",
    "SilentScan",
    "ThumbnailSource",
    "active_model",
    "add_job_items",
    "allocate_chunk_indices",
    "any_face_results",
    "archive_images",
    "changed_image_ids",
    "count_job_items",
    "count_reviews",
    "count_unread",
    "create_job",
    "end_scan",
    "failed_and_unchanged",
    "failed_images",
    "failed_items",
    "finish_job_if_complete",
    "get_job",
    "get_model",
    "human_labels",
    "image_ids_for_uris",
    "iter_face_rows",
    "iter_ledger_rows",
    "iter_results",
    "job_counts",
    "job_summary",
    "keep_job_summary",
    "label_pairs",
    "labeled_fingerprints",
    "labeled_fingerprints_by_id",
    "labeled_image_ids",
    "latest_confidence_below",
    "latest_jobs",
    "latest_label_not_by",
    "latest_outcome_failed",
    "latest_uncertain",
    "ledger_query",
    "list_models",
    "mark_chunk_published",
    "mark_chunks_published",
    "missing_items",
    "model_classes",
    "open_chunks",
    "outcome_reasons",
    "pending_images",
    "pending_uris",
    "previous_active_model",
    "promote_if_active",
    "prunable_jobs",
    "prune_job",
    "ranked_review_items",
    "record_chunks",
    "record_images",
    "record_listings",
    "record_outcomes",
    "record_retrain_run",
    "record_reviews",
    "recorded_churn",
    "register_model",
    "reopen_job",
    "results_query",
    "return_to_pending",
    "review_facets",
    "review_items",
    "set_active_model",
    "set_job_status",
    "set_model_hashes",
    "set_model_status",
    "settled_listings",
    "silent_scans",
    "thumbnail_source",
    "unfinished_chunks",
    "unread_counts",
    "upsert_images",
]
