from .search import main
import sys

sys.exit(main())
