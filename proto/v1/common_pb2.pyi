from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BuildState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILD_STATE_UNSPECIFIED: _ClassVar[BuildState]
    BUILD_STATE_QUEUED: _ClassVar[BuildState]
    BUILD_STATE_RUNNING: _ClassVar[BuildState]
    BUILD_STATE_ASSEMBLING: _ClassVar[BuildState]
    BUILD_STATE_SUCCEEDED: _ClassVar[BuildState]
    BUILD_STATE_FAILED: _ClassVar[BuildState]
    BUILD_STATE_CANCELLED: _ClassVar[BuildState]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_ASSIGNED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_PUSHED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class BuildMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILD_MODE_UNSPECIFIED: _ClassVar[BuildMode]
    BUILD_MODE_NATIVE: _ClassVar[BuildMode]
    BUILD_MODE_EMULATED: _ClassVar[BuildMode]

class EmulationPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMULATION_POLICY_UNSPECIFIED: _ClassVar[EmulationPolicy]
    EMULATION_POLICY_FALLBACK: _ClassVar[EmulationPolicy]
    EMULATION_POLICY_NEVER: _ClassVar[EmulationPolicy]
    EMULATION_POLICY_ALLOW: _ClassVar[EmulationPolicy]

class ContextKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_KIND_TAR: _ClassVar[ContextKind]
    CONTEXT_KIND_MANIFEST: _ClassVar[ContextKind]
BUILD_STATE_UNSPECIFIED: BuildState
BUILD_STATE_QUEUED: BuildState
BUILD_STATE_RUNNING: BuildState
BUILD_STATE_ASSEMBLING: BuildState
BUILD_STATE_SUCCEEDED: BuildState
BUILD_STATE_FAILED: BuildState
BUILD_STATE_CANCELLED: BuildState
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_ASSIGNED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_PUSHED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
BUILD_MODE_UNSPECIFIED: BuildMode
BUILD_MODE_NATIVE: BuildMode
BUILD_MODE_EMULATED: BuildMode
EMULATION_POLICY_UNSPECIFIED: EmulationPolicy
EMULATION_POLICY_FALLBACK: EmulationPolicy
EMULATION_POLICY_NEVER: EmulationPolicy
EMULATION_POLICY_ALLOW: EmulationPolicy
CONTEXT_KIND_TAR: ContextKind
CONTEXT_KIND_MANIFEST: ContextKind

class ContextChunk(_message.Message):
    __slots__ = ("digest", "size", "data", "kind")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    data: bytes
    kind: ContextKind
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ..., kind: _Optional[_Union[ContextKind, str]] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("digest", "size", "offset", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    offset: int
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlobRange(_message.Message):
    __slots__ = ("digest", "size", "offset")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    offset: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class RegistryAuth(_message.Message):
    __slots__ = ("registry", "username", "password")
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    registry: str
    username: str
    password: str
    def __init__(self, registry: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class BuildSecret(_message.Message):
    __slots__ = ("id", "value")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    id: str
    value: bytes
    def __init__(self, id: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
