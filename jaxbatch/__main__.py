import sys

from jaxbatch.cli import main

sys.exit(main())
