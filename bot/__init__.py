"""``remex bot``: a Bots-API execution worker for BuildGrid.

BuildGrid schedules actions but runs none itself: bots lease them over the
Bots API (google.devtools.remoteworkers.v1test2). ``remex bot`` is one::

    remex bot --remote grpc://buildgrid:50051 --capacity 4 [--instance NAME]
              [--platform KEY=VALUE ...] [--runner buildbox-run|host]
              [--name BOT_ID] [--grace SECONDS] [--workdir DIR]

It opens a bot session (platform properties ``OSFamily``/``ISA`` of this host
unless ``--platform`` says otherwise, capacity as a worker config), long-polls
UpdateBotSession, runs up to ``--capacity`` leased actions at once and
completes each lease with an ActionResult (exit code, stdout/stderr and
outputs in the server's CAS, ExecutedActionMetadata with timestamps and the
bot id as the worker).

Modules:

``session``   the session loop and lease bookkeeping (:class:`~bot.session.Bot`)
``lease``     one lease: payload -> runner -> status and ActionResult
``runners``   ``buildbox-run`` (bubblewrap sandbox, the default) and ``host``
              (NO sandbox: trusted actions only)
``main``      options, wiring, signals (SIGTERM: finish within ``--grace`` or
              give back, then BOT_TERMINATING)

The Bots client itself is :mod:`pipeline.reapi.bots` (only ``pipeline.reapi``
speaks gRPC); ``remex bot`` as a managed process (stacks, tests, benchmarks)
is :class:`pipeline.servers.bot.BotProcess`.
"""
