"""`star adapters ...`: placeholder until the patch stack lands."""


def register(sub) -> None:
    pass
