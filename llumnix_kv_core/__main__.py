import sys

from llumnix_kv_core.cli import main

sys.exit(main())
