"""`star serve`: placeholder until the language server lands."""


def register(sub) -> None:
    pass
