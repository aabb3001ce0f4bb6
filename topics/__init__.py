"""Topic names, partition counts, configs and the idempotent bootstrap."""

from topics.catalog import TopicSettings, TopicSpec, core_topics
from topics.ensure import EnsureResult, ensure_topics

__all__ = ["EnsureResult", "TopicSettings", "TopicSpec", "core_topics", "ensure_topics"]
