"""The report card: quality (`jisu eval`: perplexity, KL divergence, top-1 agreement), speed
(`jisu bench`: throughput, latency, memory, bandwidth, peers) and size of a model."""
from .bench import run_bench
from .report import ReportCard, update_artifact_card, write_report_card
from .runner import QualityResult, evaluate

__all__ = ["evaluate", "QualityResult", "run_bench", "ReportCard", "write_report_card", "update_artifact_card"]
