"""The bridge's MQTT topics, built and parsed in one place (docs/MQTT.md lists them).

    PREFIX/NODE/jobs/MODEL/TASK          jobs for this node only
    PREFIX/jobs/MODEL/TASK               jobs for any node of a group: subscribed as $share/GROUP/PREFIX/jobs/MODEL/+
    PREFIX/NODE/results/ID               answers to requests that named no response topic
    PREFIX/NODE/errors                   answers to payloads too broken to say where an answer goes
    PREFIX/NODE/status                   retained "online" / "offline" (the last will)
    PREFIX/NODE/models                   retained JSON: the models and tasks this node serves
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobTopic:
    """Where a job message was published: its model, task, and whether it came through the group."""

    model: str
    task: str
    shared: bool


@dataclass(frozen=True)
class Topics:
    """The topic names of one node."""

    prefix: str
    node: str
    group: str | None

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.node}/status"

    @property
    def models(self) -> str:
        return f"{self.prefix}/{self.node}/models"

    @property
    def errors(self) -> str:
        return f"{self.prefix}/{self.node}/errors"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}/{self.node}/results/{request_id}"

    def direct_filter(self) -> str:
        """Every model and task addressed to this node (unknown ones are answered with an error)."""
        return f"{self.prefix}/{self.node}/jobs/+/+"

    def shared_filters(self, models: list[str]) -> list[str]:
        """One shared subscription per served model, so a group member only gets models it has."""
        if self.group is None:
            return []
        return [f"$share/{self.group}/{self.prefix}/jobs/{model}/+" for model in models]

    def parse(self, topic: str) -> JobTopic | None:
        """The job a message's topic names, or None for a topic that is not a job topic of ours."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[0] == self.prefix and parts[1] == self.node and parts[2] == "jobs":
            return JobTopic(parts[3], parts[4], shared=False)
        if len(parts) == 4 and parts[0] == self.prefix and parts[1] == "jobs":
            return JobTopic(parts[2], parts[3], shared=True)
        return None


def valid_reply_topic(topic: object) -> bool:
    """A topic a result may be published to: a non-empty string without wildcards or a leading '$'."""
    return (isinstance(topic, str) and 0 < len(topic.encode()) <= 1024 and "+" not in topic
            and "#" not in topic and not topic.startswith("$") and "\0" not in topic)
