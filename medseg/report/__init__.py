"""What people look at: :mod:`.plots` (PNG figures), :mod:`.html` (a run's HTML report, with
:mod:`.cv`, :mod:`.files`, :mod:`.overlays` and :mod:`.page`) and :mod:`.stats_page` (the
statistics report, no model)."""
