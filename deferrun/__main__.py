from deferrun.cli import main

raise SystemExit(main())
