import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from polyarch.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_OCI_LAYOUT: _ClassVar[ExportFormat]
    EXPORT_FORMAT_DOCKER_ARCHIVE: _ClassVar[ExportFormat]
    EXPORT_FORMAT_ROOTFS: _ClassVar[ExportFormat]
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_OCI_LAYOUT: ExportFormat
EXPORT_FORMAT_DOCKER_ARCHIVE: ExportFormat
EXPORT_FORMAT_ROOTFS: ExportFormat

class StatContextRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class StatContextResponse(_message.Message):
    __slots__ = ("present", "size", "max_bytes")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    present: bool
    size: int
    max_bytes: int
    def __init__(self, present: _Optional[bool] = ..., size: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class UploadContextResponse(_message.Message):
    __slots__ = ("digest", "size", "already_present", "missing_blobs", "missing_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MISSING_BLOBS_FIELD_NUMBER: _ClassVar[int]
    MISSING_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    already_present: bool
    missing_blobs: int
    missing_bytes: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ..., missing_blobs: _Optional[int] = ..., missing_bytes: _Optional[int] = ...) -> None: ...

class MissingBlobsRequest(_message.Message):
    __slots__ = ("context_digest",)
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    context_digest: str
    def __init__(self, context_digest: _Optional[str] = ...) -> None: ...

class UploadBlobsChunk(_message.Message):
    __slots__ = ("context_digest", "blob")
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    context_digest: str
    blob: _common_pb2.BlobChunk
    def __init__(self, context_digest: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobChunk, _Mapping]] = ...) -> None: ...

class UploadBlobsResponse(_message.Message):
    __slots__ = ("stored_blobs", "stored_bytes", "missing_blobs", "missing_bytes")
    STORED_BLOBS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MISSING_BLOBS_FIELD_NUMBER: _ClassVar[int]
    MISSING_BYTES_FIELD_NUMBER: _ClassVar[int]
    stored_blobs: int
    stored_bytes: int
    missing_blobs: int
    missing_bytes: int
    def __init__(self, stored_blobs: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., missing_blobs: _Optional[int] = ..., missing_bytes: _Optional[int] = ...) -> None: ...

class SubmitBuildRequest(_message.Message):
    __slots__ = ("context_digest", "dockerfile", "platforms", "tags", "build_args", "target", "labels", "emulation", "idempotency_key", "cache_from", "cache_to", "registry_auths", "secrets", "no_cache", "pull", "annotations", "no_publish", "scan_command", "provenance", "sign_key", "sign_with")
    class BuildArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    BUILD_ARGS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EMULATION_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FROM_FIELD_NUMBER: _ClassVar[int]
    CACHE_TO_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTHS_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    NO_PUBLISH_FIELD_NUMBER: _ClassVar[int]
    SCAN_COMMAND_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SIGN_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGN_WITH_FIELD_NUMBER: _ClassVar[int]
    context_digest: str
    dockerfile: str
    platforms: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.RepeatedScalarFieldContainer[str]
    build_args: _containers.ScalarMap[str, str]
    target: str
    labels: _containers.ScalarMap[str, str]
    emulation: _common_pb2.EmulationPolicy
    idempotency_key: str
    cache_from: _containers.RepeatedScalarFieldContainer[str]
    cache_to: _containers.RepeatedScalarFieldContainer[str]
    registry_auths: _containers.RepeatedCompositeFieldContainer[_common_pb2.RegistryAuth]
    secrets: _containers.RepeatedCompositeFieldContainer[_common_pb2.BuildSecret]
    no_cache: bool
    pull: bool
    annotations: _containers.RepeatedScalarFieldContainer[str]
    no_publish: bool
    scan_command: str
    provenance: str
    sign_key: bytes
    sign_with: str
    def __init__(self, context_digest: _Optional[str] = ..., dockerfile: _Optional[str] = ..., platforms: _Optional[_Iterable[str]] = ..., tags: _Optional[_Iterable[str]] = ..., build_args: _Optional[_Mapping[str, str]] = ..., target: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., emulation: _Optional[_Union[_common_pb2.EmulationPolicy, str]] = ..., idempotency_key: _Optional[str] = ..., cache_from: _Optional[_Iterable[str]] = ..., cache_to: _Optional[_Iterable[str]] = ..., registry_auths: _Optional[_Iterable[_Union[_common_pb2.RegistryAuth, _Mapping]]] = ..., secrets: _Optional[_Iterable[_Union[_common_pb2.BuildSecret, _Mapping]]] = ..., no_cache: _Optional[bool] = ..., pull: _Optional[bool] = ..., annotations: _Optional[_Iterable[str]] = ..., no_publish: _Optional[bool] = ..., scan_command: _Optional[str] = ..., provenance: _Optional[str] = ..., sign_key: _Optional[bytes] = ..., sign_with: _Optional[str] = ...) -> None: ...

class SubmitBuildResponse(_message.Message):
    __slots__ = ("build", "existing")
    BUILD_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    build: Build
    existing: bool
    def __init__(self, build: _Optional[_Union[Build, _Mapping]] = ..., existing: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "platform", "state", "agent", "mode", "digest", "size", "media_type", "attempt", "error", "failed_step", "queued_at", "started_at", "finished_at", "requeue_reasons", "config_digest", "attestation_digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_REASONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    platform: str
    state: _common_pb2.JobState
    agent: str
    mode: _common_pb2.BuildMode
    digest: str
    size: int
    media_type: str
    attempt: int
    error: str
    failed_step: str
    queued_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    requeue_reasons: _containers.RepeatedScalarFieldContainer[str]
    config_digest: str
    attestation_digest: str
    def __init__(self, id: _Optional[str] = ..., platform: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., agent: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.BuildMode, str]] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., media_type: _Optional[str] = ..., attempt: _Optional[int] = ..., error: _Optional[str] = ..., failed_step: _Optional[str] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requeue_reasons: _Optional[_Iterable[str]] = ..., config_digest: _Optional[str] = ..., attestation_digest: _Optional[str] = ...) -> None: ...

class Build(_message.Message):
    __slots__ = ("id", "state", "tags", "index_digest", "index_media_type", "jobs", "error", "context_digest", "dockerfile", "created_at", "finished_at", "emulation", "index_size")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIGEST_FIELD_NUMBER: _ClassVar[int]
    INDEX_MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EMULATION_FIELD_NUMBER: _ClassVar[int]
    INDEX_SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: _common_pb2.BuildState
    tags: _containers.RepeatedScalarFieldContainer[str]
    index_digest: str
    index_media_type: str
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    error: str
    context_digest: str
    dockerfile: str
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    emulation: _common_pb2.EmulationPolicy
    index_size: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.BuildState, str]] = ..., tags: _Optional[_Iterable[str]] = ..., index_digest: _Optional[str] = ..., index_media_type: _Optional[str] = ..., jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., error: _Optional[str] = ..., context_digest: _Optional[str] = ..., dockerfile: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., emulation: _Optional[_Union[_common_pb2.EmulationPolicy, str]] = ..., index_size: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("job_id", "platform", "attempt", "line")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    platform: str
    attempt: int
    line: str
    def __init__(self, job_id: _Optional[str] = ..., platform: _Optional[str] = ..., attempt: _Optional[int] = ..., line: _Optional[str] = ...) -> None: ...

class BuildEvent(_message.Message):
    __slots__ = ("build", "job", "log")
    BUILD_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    build: Build
    job: Job
    log: LogLine
    def __init__(self, build: _Optional[_Union[Build, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ...) -> None: ...

class WatchBuildRequest(_message.Message):
    __slots__ = ("build_id", "log_tail")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    log_tail: int
    def __init__(self, build_id: _Optional[str] = ..., log_tail: _Optional[int] = ...) -> None: ...

class GetBuildRequest(_message.Message):
    __slots__ = ("build_id",)
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    def __init__(self, build_id: _Optional[str] = ...) -> None: ...

class CancelBuildRequest(_message.Message):
    __slots__ = ("build_id", "reason")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    reason: str
    def __init__(self, build_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListBuildsRequest(_message.Message):
    __slots__ = ("limit", "page_size", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_size: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBuildsResponse(_message.Message):
    __slots__ = ("builds", "next_page_token")
    BUILDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    builds: _containers.RepeatedCompositeFieldContainer[Build]
    next_page_token: str
    def __init__(self, builds: _Optional[_Iterable[_Union[Build, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportBuildRequest(_message.Message):
    __slots__ = ("build_id", "format", "platforms", "registry_auths")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTHS_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    format: ExportFormat
    platforms: _containers.RepeatedScalarFieldContainer[str]
    registry_auths: _containers.RepeatedCompositeFieldContainer[_common_pb2.RegistryAuth]
    def __init__(self, build_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., platforms: _Optional[_Iterable[str]] = ..., registry_auths: _Optional[_Iterable[_Union[_common_pb2.RegistryAuth, _Mapping]]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
