"""python -m nnunet_bento.cli"""

import sys

from .main import main

sys.exit(main())
