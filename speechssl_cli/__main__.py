"""``python -m speechssl_cli``: the ``speechssl`` command."""

import sys

from speechssl_cli import main

sys.exit(main())
