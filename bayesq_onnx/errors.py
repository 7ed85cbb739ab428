"""Error family. A :class:`UserError` is the user's to fix: the CLI prints its one line and exits 2."""


class BayesQError(Exception):
    """Base of every error this package raises on purpose."""


class UserError(BayesQError):
    """Bad input (model, data, flags, paths): one line saying what is wrong and what to pass instead."""


class PassFailure(BayesQError):
    """A compile pass failed; the message names the pass and the tensor."""
