"""``python -m symatomic.mtt ARGS``: metatrain's command-line interface (``mtt ARGS``)
with symatomic registered as the architecture ``experimental.symatomic``.

``mtt`` itself cannot find architectures outside metatrain's package; this wrapper
calls :func:`symatomic.mtt.register` and then metatrain's ``main()`` with the same
arguments, e.g. ``python -m symatomic.mtt train options.yaml`` or
``python -m symatomic.mtt export model.ckpt``.
"""

import sys

from . import register


def main() -> None:
    """Register the architecture and run metatrain's command-line interface."""
    register()
    from metatrain.__main__ import main as metatrain_main

    sys.argv[0] = "mtt"
    metatrain_main()


if __name__ == "__main__":
    main()
