"""Builder backends that build one platform of a Dockerfile and push it by digest."""

from polyarch.agent.builders.base import (
    Builder,
    BuilderUnavailable,
    BuildFailed,
    BuildRequest,
    PushedImage,
)

__all__ = ["BuildFailed", "BuildRequest", "Builder", "BuilderUnavailable", "PushedImage"]
