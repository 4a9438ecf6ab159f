import sys

from ferrodiff.cli import main

sys.exit(main())
