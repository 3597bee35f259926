import sys

from morpheus_jax.cli.main import main

sys.exit(main())
