//! `query-qmp-schema` and `query-commands`, generated from the schema.
//!
//! As in QEMU, commands and events keep their names, built-in types keep
//! theirs (every integer flavour is `int`), arrays are `[T]`, and every other
//! type is masked as a decimal number assigned in order of first reference.

use crate::schema::{self, Schema, TypeDef, BUILTINS};
use indexmap::IndexMap;
use serde_json::{json, Map, Value};

/// The reply of `query-commands`.
pub fn query_commands(schema: &Schema) -> Value {
    Value::Array(
        schema
            .commands
            .keys()
            .map(|name| json!({ "name": name }))
            .collect(),
    )
}

/// The reply of `query-qmp-schema`.
pub fn query_qmp_schema(schema: &Schema) -> Value {
    let mut g = Generator {
        schema,
        names: IndexMap::new(),
        queue: Vec::new(),
        out: Vec::new(),
    };
    for cmd in schema.commands.values() {
        let arg = g.reference(&cmd.arg_type);
        let ret = g.reference(cmd.ret_type.as_deref().unwrap_or(schema::EMPTY));
        let mut entity = entity(&cmd.name, "command", &cmd.features);
        entity.insert("arg-type".into(), arg.into());
        entity.insert("ret-type".into(), ret.into());
        g.out.push(Value::Object(entity));
    }
    for ev in schema.events.values() {
        let arg = g.reference(&ev.arg_type);
        let mut entity = entity(&ev.name, "event", &[]);
        entity.insert("arg-type".into(), arg.into());
        g.out.push(Value::Object(entity));
    }
    while !g.queue.is_empty() {
        let pending = std::mem::take(&mut g.queue);
        for ty in pending {
            g.emit(&ty);
        }
    }
    Value::Array(g.out)
}

struct Generator<'s> {
    schema: &'s Schema,
    /// Schema type name -> name shown to clients.
    names: IndexMap<String, String>,
    queue: Vec<String>,
    out: Vec<Value>,
}

fn entity(name: &str, meta: &str, features: &[String]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("name".into(), name.into());
    m.insert("meta-type".into(), meta.into());
    if !features.is_empty() {
        m.insert("features".into(), json!(features));
    }
    m
}

impl Generator<'_> {
    /// The client-visible name of `ty`, queueing its definition on first use.
    fn reference(&mut self, ty: &str) -> String {
        let key = match BUILTINS.iter().find(|(n, _)| *n == ty) {
            Some((_, "int")) => "int",
            Some((_, "boolean")) => "bool",
            _ => ty,
        };
        if let Some(name) = self.names.get(key) {
            return name.clone();
        }
        let shown = if schema::is_builtin(key) {
            key.to_string()
        } else if let Some(elem) = schema::array_element(key) {
            let elem = self.reference(elem);
            format!("[{elem}]")
        } else {
            self.names
                .values()
                .filter(|n| n.parse::<u64>().is_ok())
                .count()
                .to_string()
        };
        self.names.insert(key.to_string(), shown.clone());
        self.queue.push(key.to_string());
        shown
    }

    fn emit(&mut self, ty: &str) {
        let name = self.names[ty].clone();
        if let Some((_, json_type)) = BUILTINS.iter().find(|(n, _)| *n == ty) {
            let mut e = entity(&name, "builtin", &[]);
            e.insert("json-type".into(), (*json_type).into());
            self.out.push(Value::Object(e));
            return;
        }
        if let Some(elem) = schema::array_element(ty) {
            let elem = self.reference(elem);
            let mut e = entity(&name, "array", &[]);
            e.insert("element-type".into(), elem.into());
            self.out.push(Value::Object(e));
            return;
        }
        let Some((def, features)) = self.schema.types.get(ty) else {
            return;
        };
        let e = match def {
            TypeDef::Enum { values } => {
                let mut e = entity(&name, "enum", features);
                let members: Vec<Value> = values
                    .iter()
                    .map(|v| {
                        let mut m = Map::new();
                        m.insert("name".into(), v.name.clone().into());
                        if !v.features.is_empty() {
                            m.insert("features".into(), json!(v.features));
                        }
                        Value::Object(m)
                    })
                    .collect();
                e.insert("members".into(), members.into());
                e.insert(
                    "values".into(),
                    values.iter().map(|v| Value::from(v.name.clone())).collect(),
                );
                e
            }
            TypeDef::Struct { members } => {
                let mut e = entity(&name, "object", features);
                e.insert("members".into(), self.members(members).into());
                e
            }
            TypeDef::Union {
                base,
                discriminator,
                variants,
            } => {
                let mut e = entity(&name, "object", features);
                e.insert("members".into(), self.members(base).into());
                e.insert("tag".into(), discriminator.clone().into());
                let variants: Vec<Value> = variants
                    .iter()
                    .map(|(case, t)| json!({"case": case, "type": self.reference(t)}))
                    .collect();
                e.insert("variants".into(), variants.into());
                e
            }
            TypeDef::Alternate { branches } => {
                let mut e = entity(&name, "alternate", features);
                let members: Vec<Value> = branches
                    .iter()
                    .map(|(_, t)| json!({"type": self.reference(t)}))
                    .collect();
                e.insert("members".into(), members.into());
                e
            }
        };
        self.out.push(Value::Object(e));
    }

    fn members(&mut self, members: &[schema::Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("name".into(), m.name.clone().into());
                o.insert("type".into(), self.reference(&m.ty).into());
                if m.optional {
                    o.insert("default".into(), Value::Null);
                }
                if !m.features.is_empty() {
                    o.insert("features".into(), json!(m.features));
                }
                Value::Object(o)
            })
            .collect()
    }
}
