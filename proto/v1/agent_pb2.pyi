from polyarch.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunningJob(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("name", "version", "builder", "native_platforms", "emulated_platforms", "slots", "labels", "running")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUILDER_FIELD_NUMBER: _ClassVar[int]
    NATIVE_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    EMULATED_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    builder: str
    native_platforms: _containers.RepeatedScalarFieldContainer[str]
    emulated_platforms: _containers.RepeatedScalarFieldContainer[str]
    slots: int
    labels: _containers.ScalarMap[str, str]
    running: _containers.RepeatedCompositeFieldContainer[RunningJob]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., builder: _Optional[str] = ..., native_platforms: _Optional[_Iterable[str]] = ..., emulated_platforms: _Optional[_Iterable[str]] = ..., slots: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., running: _Optional[_Iterable[_Union[RunningJob, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: _containers.RepeatedCompositeFieldContainer[RunningJob]
    def __init__(self, running: _Optional[_Iterable[_Union[RunningJob, _Mapping]]] = ...) -> None: ...

class JobStarted(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class JobLog(_message.Message):
    __slots__ = ("job_id", "attempt", "lines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., lines: _Optional[_Iterable[str]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "attempt", "ok", "digest", "size", "media_type", "error", "failed_step", "infrastructure_error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_FIELD_NUMBER: _ClassVar[int]
    INFRASTRUCTURE_ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    ok: bool
    digest: str
    size: int
    media_type: str
    error: str
    failed_step: str
    infrastructure_error: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., ok: _Optional[bool] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., media_type: _Optional[str] = ..., error: _Optional[str] = ..., failed_step: _Optional[str] = ..., infrastructure_error: _Optional[bool] = ...) -> None: ...

class AgentDraining(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "started", "log", "result", "draining")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: Heartbeat
    started: JobStarted
    log: JobLog
    result: JobResult
    draining: AgentDraining
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., started: _Optional[_Union[JobStarted, _Mapping]] = ..., log: _Optional[_Union[JobLog, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., draining: _Optional[_Union[AgentDraining, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("coordinator_version", "heartbeat_interval_ms")
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    coordinator_version: str
    heartbeat_interval_ms: int
    def __init__(self, coordinator_version: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job_id", "attempt", "build_id", "platform", "mode", "context_digest", "dockerfile", "build_args", "target", "labels", "repository", "push_tag", "cache_from", "cache_to", "registry_auths", "secrets", "no_cache", "pull")
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
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    BUILD_ARGS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    PUSH_TAG_FIELD_NUMBER: _ClassVar[int]
    CACHE_FROM_FIELD_NUMBER: _ClassVar[int]
    CACHE_TO_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_AUTHS_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    build_id: str
    platform: str
    mode: _common_pb2.BuildMode
    context_digest: str
    dockerfile: str
    build_args: _containers.ScalarMap[str, str]
    target: str
    labels: _containers.ScalarMap[str, str]
    repository: str
    push_tag: str
    cache_from: _containers.RepeatedScalarFieldContainer[str]
    cache_to: _containers.RepeatedScalarFieldContainer[str]
    registry_auths: _containers.RepeatedCompositeFieldContainer[_common_pb2.RegistryAuth]
    secrets: _containers.RepeatedCompositeFieldContainer[_common_pb2.BuildSecret]
    no_cache: bool
    pull: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., build_id: _Optional[str] = ..., platform: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.BuildMode, str]] = ..., context_digest: _Optional[str] = ..., dockerfile: _Optional[str] = ..., build_args: _Optional[_Mapping[str, str]] = ..., target: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., repository: _Optional[str] = ..., push_tag: _Optional[str] = ..., cache_from: _Optional[_Iterable[str]] = ..., cache_to: _Optional[_Iterable[str]] = ..., registry_auths: _Optional[_Iterable[_Union[_common_pb2.RegistryAuth, _Mapping]]] = ..., secrets: _Optional[_Iterable[_Union[_common_pb2.BuildSecret, _Mapping]]] = ..., no_cache: _Optional[bool] = ..., pull: _Optional[bool] = ...) -> None: ...

class CancelJob(_message.Message):
    __slots__ = ("job_id", "attempt", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "assign", "cancel")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    assign: Assignment
    cancel: CancelJob
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., assign: _Optional[_Union[Assignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelJob, _Mapping]] = ...) -> None: ...

class FetchContextRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class FetchBlobsRequest(_message.Message):
    __slots__ = ("context_digest", "blobs")
    CONTEXT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    context_digest: str
    blobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.BlobRange]
    def __init__(self, context_digest: _Optional[str] = ..., blobs: _Optional[_Iterable[_Union[_common_pb2.BlobRange, _Mapping]]] = ...) -> None: ...
