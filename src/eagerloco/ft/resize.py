"""placeholder"""


def resize_outer_states(*a, **k):
    raise NotImplementedError
