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


class ActionError(RollbackdError):
    """An action attempt failed; the plan runner records it and may retry."""


class PluginError(RollbackdError):
    """A source or action type is unknown or its plugin cannot be loaded."""
