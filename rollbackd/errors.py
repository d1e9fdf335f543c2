"""Errors rollbackd raises on purpose: one root, a few subclasses, messages saying what to do."""


class RollbackdError(Exception):
    """Base of every error rollbackd raises on purpose."""


class ConfigError(RollbackdError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SecretError(RollbackdError):
    """A secret named by the configuration cannot be read."""


class StateError(RollbackdError):
    """The state store cannot be opened or is from an incompatible version."""


class NoIncidentError(StateError):
    """The state store holds no incident with the id asked for (the store itself is fine)."""


class ActionError(RollbackdError):
    """An action attempt failed; the plan runner records it and may retry.

    ``transient`` says whether the same attempt may well succeed later (a 503, a refused
    connection): such failures are retried until ``give_up_after`` without using up
    ``retries``. None lets the runner judge by the exception's cause.
    """

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.transient = transient


class PluginError(RollbackdError):
    """A source or action type is unknown or its plugin cannot be loaded."""


class UnknownMonitorError(RollbackdError):
    """The monitor named in a request is not configured."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        super().__init__(f"no monitor named {monitor!r}")


class MonitorNotLatchedError(RollbackdError):
    """A re-arm asked for a monitor that is not rolled back."""

    def __init__(self, monitor: str, state: str) -> None:
        self.monitor, self.state = monitor, state
        super().__init__(
            f"monitor {monitor!r} is {state}, not rolled_back: there is nothing to re-arm"
        )


class IncidentError(RollbackdError):
    """A request named an incident it cannot act on; ``incident`` is the id it named."""

    def __init__(self, incident: str, message: str) -> None:
        self.incident = incident
        super().__init__(message)


class UnknownIncidentError(IncidentError):
    """The incident named in a request is not in the state store."""

    def __init__(self, incident: str) -> None:
        ids = "rollbackd status lists the recent incidents' ids"
        super().__init__(incident, f"no incident {incident!r}: {ids}")


class IncidentNotRetryableError(IncidentError):
    """A retry asked for an incident still running, or one without a failed step."""

    def __init__(self, incident: str, reason: str) -> None:
        self.reason = reason
        super().__init__(incident, f"incident {incident!r} cannot be retried: {reason}")


class IncidentNotWaitingError(IncidentError):
    """An approval asked for an incident whose plan is not waiting (running, done, approved)."""

    def __init__(self, incident: str) -> None:
        why = "is not waiting for approval: its plan already ran or runs"
        super().__init__(incident, f"incident {incident!r} {why}")


class DaemonUnreachableError(RollbackdError):
    """The CLI could not talk to the daemon's HTTP surface."""


class ApiError(RollbackdError):
    """The daemon answered a CLI request with an error."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class DeposedError(StateError):
    """A write refused because another daemon took the lead (a newer generation holds it).

    The daemon that gets it stops acting at once and becomes a standby.
    """


class UnknownRolloutError(RollbackdError):
    """The rollout named in a request is not configured."""

    def __init__(self, rollout: str) -> None:
        self.rollout = rollout
        super().__init__(f"no rollout named {rollout!r} in [rollouts]")


class RolloutRefusedError(RollbackdError):
    """An operator's request does not apply to the rollout's state (e.g. resume while holding)."""

    def __init__(self, rollout: str, operation: str, reason: str) -> None:
        self.rollout, self.operation, self.reason = rollout, operation, reason
        super().__init__(f"rollout {rollout!r}: cannot {operation}: {reason}")
