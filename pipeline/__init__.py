"""remex: BuildStream-style elements built on a REAPI v2 service, one Celery task per stage."""

__version__ = "0.1.0"
