//! The JSON shapes of `--json` that are not a struct's own (README, "JSON
//! output"): counters keyed by name, and the changes a command made.

use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value};

use crate::reconcile::{Change, Loaded};
use crate::stats::Counter;

/// Serializes counters as one object keyed by counter name, in the
/// datapath's order: `{"to_backend": {"packets": 1, "bytes": 60}, ...}`.
pub fn by_name<S: Serializer>(c: &[(String, Counter)], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(c.len()))?;
    for (name, v) in c {
        m.serialize_entry(name, v)?;
    }
    m.end()
}

/// Counters by name, serialised as an object keyed by name.
pub struct Counters<'a>(pub &'a [(String, Counter)]);

impl serde::Serialize for Counters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        by_name(self.0, s)
    }
}

/// One change as JSON: `{"op": ..., ...}`, a service as everywhere else
/// (`{"vip", "port", "proto"}`) and, once made (`after`), the ids given.
pub fn change(c: &Change, after: Option<&Loaded>) -> Value {
    let id = |s| after.and_then(|l| l.services.get(s)).map(|s| s.id);
    let be_id = |s, a| after.and_then(|l| l.backend_id(s, a));
    let mut v = match c {
        Change::Attach(i) => json!({"op": "attach", "iface": i.name, "mode": i.mode.to_string()}),
        Change::AddService(s, _) => json!({"op": "add_service", "service": s, "id": id(s)}),
        Change::AddBackend(s, a, w) => json!({
            "op": "add_backend", "service": s, "backend": a.to_string(), "weight": w,
            "id": be_id(s, *a),
        }),
        Change::SetWeight(s, a, o, n) => json!({
            "op": "set_weight", "service": s, "backend": a.to_string(), "from": o, "to": n,
        }),
        Change::DelBackend(s, a, _) => {
            json!({"op": "del_backend", "service": s, "backend": a.to_string()})
        }
        Change::DelService(s, _) => json!({"op": "del_service", "service": s}),
    };
    if let Some(m) = v.as_object_mut() {
        m.retain(|_, x| !x.is_null());
    }
    v
}

/// Changes as a JSON array.
pub fn changes(cs: &[Change], after: Option<&Loaded>) -> Value {
    Value::Array(cs.iter().map(|c| change(c, after)).collect())
}
