"""Error types shared by every stage. The CLI turns an `InputError` into one line on stderr and exit code 2."""


class InputError(ValueError):
    """Bad input from a user: a corrupt image, a bad region, a broken bundle, a context overflow.

    The message is one clear line meant for the person who gave the input."""


class BundleError(InputError):
    """A bundle that is missing files, fails its checksums, or does not match its manifest."""


class BuildError(InputError):
    """The llama.cpp library (or tools) would execute instructions this CPU lacks: rebuild it, don't run it.

    Also exit code 2 with one line: the message names the missing instruction sets and the command that fixes it."""
