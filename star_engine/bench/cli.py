"""`star bench`: placeholder until the benchmark lands."""


def register(sub) -> None:
    pass
