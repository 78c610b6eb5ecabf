"""The web dashboard every agent serves at ``/ui/`` on its gateway's listener: static HTML, CSS
and JavaScript from ``static/`` (no build step, nothing from a CDN) and a small read-only JSON
API under ``/ui/api/`` (:mod:`.api`) that reads what ``cim-place status``, ``nodes`` and
``tasks`` read, through :mod:`cim_place.cluster.state.overview`."""

from cim_place.http.ui.app import add_dashboard

__all__ = ["add_dashboard"]
