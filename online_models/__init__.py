"""Online models: learners that learn from every event, and the blend that ranks with them.

Pure: no Kafka, no Redis, no I/O (``datasets`` reads logs for the offline tools only).
The Faust worker, ``streamrec evaluate`` and the benchmarks all call :class:`Recommender`.
"""

from online_models.base import OnlineLearner, SnapshotError, learner_classes
from online_models.covisit import CoVisitation
from online_models.mf import ImplicitMF
from online_models.popularity import GlobalPopularity, RecentPopularity, TrendingPopularity
from online_models.recommender import Recommender, RecommenderConfig
from online_models.reminder import RecentlyViewed
from online_models.reranker import ClickReranker
from online_models.types import Explanation, Interaction, ScoredItem, UserContext

__all__ = [
    "ClickReranker",
    "CoVisitation",
    "Explanation",
    "GlobalPopularity",
    "ImplicitMF",
    "Interaction",
    "OnlineLearner",
    "RecentPopularity",
    "RecentlyViewed",
    "Recommender",
    "RecommenderConfig",
    "ScoredItem",
    "SnapshotError",
    "TrendingPopularity",
    "UserContext",
    "learner_classes",
]
