from speech.cli import main

raise SystemExit(main())
