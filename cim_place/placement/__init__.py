"""The planner (a pure function of object, policy and node map) and the reconciler. No NATS here.

Modules: :mod:`~cim_place.placement.model` (volumes, rules, placements),
:mod:`~cim_place.placement.planner` (one object), :mod:`~cim_place.placement.batch` (a million,
vectorised), :mod:`~cim_place.placement.rules` (policy -> rule, heartbeats -> node map),
:mod:`~cim_place.placement.reconciler` (what to do for one object; its inputs and actions in
:mod:`~cim_place.placement.reconcile_model`, steps 1 and 7 in ``reconcile_view`` and
``reconcile_status``),
:mod:`~cim_place.placement.status` (what ``cim-place status`` shows), and demand-driven cached
copies: :mod:`~cim_place.placement.demand_window` (read counts), :mod:`~cim_place.placement.demand`
(the decision) and :mod:`~cim_place.placement.demand_cache` (the ledger; docs/DEMAND.md).
Nothing is imported here: the status model is read by every CLI command, which should not pay
for numpy.
"""
