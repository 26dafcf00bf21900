//! The schema: every command, event and type blockd offers over QMP.
//!
//! The declarations live in `schema/*.json` beside this crate, written in a
//! QAPI-like form (`{"struct": ...}`, `{"union": ...}`, `{"command": ...}`). They
//! are read once at start-up; from them come argument validation
//! ([`crate::visit`]), `query-commands` and `query-qmp-schema`
//! ([`crate::introspect`]). The daemon checks at start-up that it has a handler
//! for every declared command and no handler without a declaration.

use indexmap::IndexMap;
use serde_json::Value;
use std::sync::OnceLock;

/// The declaration files, in schema order.
const SOURCES: &[(&str, &str)] = &[
    ("control.json", include_str!("../schema/control.json")),
    ("block.json", include_str!("../schema/block.json")),
    ("job.json", include_str!("../schema/job.json")),
    ("object.json", include_str!("../schema/object.json")),
];

/// A named member of a struct, union base or command argument list.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub ty: String,
    pub optional: bool,
    pub features: Vec<String>,
}

/// One value of an enum.
#[derive(Debug, Clone)]
pub struct EnumValue {
    pub name: String,
    pub features: Vec<String>,
}

/// A type of the schema. Array types are not declared: `[T]` names one.
#[derive(Debug, Clone)]
pub enum TypeDef {
    Enum {
        values: Vec<EnumValue>,
    },
    Struct {
        members: Vec<Member>,
    },
    /// A flat union: the base members (with the discriminator among them) and
    /// one struct type per discriminator value.
    Union {
        base: Vec<Member>,
        discriminator: String,
        variants: Vec<(String, String)>,
    },
    /// An alternate: one of several types, told apart by JSON type.
    Alternate {
        branches: Vec<(String, String)>,
    },
}

/// A declared command.
#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    /// The name of the (possibly implicit) struct type of the arguments.
    pub arg_type: String,
    pub ret_type: Option<String>,
    pub features: Vec<String>,
}

/// A declared event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub arg_type: String,
}

/// The whole schema, in declaration order.
#[derive(Debug, Default)]
pub struct Schema {
    pub types: IndexMap<String, (TypeDef, Vec<String>)>,
    pub commands: IndexMap<String, Command>,
    pub events: IndexMap<String, Event>,
}

/// The built-in scalar types and the JSON type introspection reports for each.
pub const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("number", "number"),
    ("int", "int"),
    ("int8", "int"),
    ("int16", "int"),
    ("int32", "int"),
    ("int64", "int"),
    ("uint8", "int"),
    ("uint16", "int"),
    ("uint32", "int"),
    ("uint64", "int"),
    ("size", "int"),
    ("bool", "boolean"),
    ("null", "null"),
    ("any", "value"),
];

/// The name of the empty argument/return struct.
pub const EMPTY: &str = "q_empty";

/// Whether `ty` is a built-in scalar type.
pub fn is_builtin(ty: &str) -> bool {
    BUILTINS.iter().any(|(name, _)| *name == ty)
}

/// The element type of an array type name `[T]`.
pub fn array_element(ty: &str) -> Option<&str> {
    ty.strip_prefix('[')?.strip_suffix(']')
}

/// The schema compiled into this binary.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut schema = Schema::default();
        for (file, text) in SOURCES {
            schema
                .load(text)
                .unwrap_or_else(|err| panic!("schema/{file} is invalid: {err}"));
        }
        if let Err(err) = schema.check() {
            panic!("schema is inconsistent: {err}");
        }
        schema
    })
}

impl Schema {
    /// Adds the declarations of one file.
    pub fn load(&mut self, text: &str) -> Result<(), String> {
        let decls: Vec<Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        self.types
            .entry(EMPTY.to_string())
            .or_insert((TypeDef::Struct { members: vec![] }, vec![]));
        for decl in &decls {
            self.declare(decl)?;
        }
        Ok(())
    }

    fn declare(&mut self, decl: &Value) -> Result<(), String> {
        let obj = decl.as_object().ok_or("declaration is not an object")?;
        let features = string_list(obj.get("features"));
        let (kind, name) = ["enum", "struct", "union", "alternate", "command", "event"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str).map(|n| (*k, n)))
            .ok_or_else(|| format!("unknown declaration {decl}"))?;
        let name = name.to_string();
        let data = obj.get("data");
        let def = match kind {
            "enum" => TypeDef::Enum {
                values: data
                    .and_then(Value::as_array)
                    .ok_or("enum without data")?
                    .iter()
                    .map(enum_value)
                    .collect::<Result<_, _>>()?,
            },
            "struct" => {
                let mut members = match obj.get("base").and_then(Value::as_str) {
                    Some(base) => self.struct_members(base)?,
                    None => vec![],
                };
                members.extend(members_of(data)?);
                TypeDef::Struct { members }
            }
            "union" => {
                let base = match obj.get("base") {
                    Some(Value::String(base)) => self.struct_members(base)?,
                    other => members_of(other)?,
                };
                let discriminator = obj
                    .get("discriminator")
                    .and_then(Value::as_str)
                    .ok_or("union without discriminator")?
                    .to_string();
                TypeDef::Union {
                    base,
                    discriminator,
                    variants: branch_list(data)?,
                }
            }
            "alternate" => TypeDef::Alternate {
                branches: branch_list(data)?,
            },
            "command" => {
                let arg_type = self.implicit(&name, "arg", data)?;
                let ret_type = obj.get("returns").and_then(Value::as_str).map(String::from);
                self.commands.insert(
                    name.clone(),
                    Command {
                        name,
                        arg_type,
                        ret_type,
                        features,
                    },
                );
                return Ok(());
            }
            "event" => {
                let arg_type = self.implicit(&name, "arg", data)?;
                self.events.insert(name.clone(), Event { name, arg_type });
                return Ok(());
            }
            _ => unreachable!("kinds are listed above"),
        };
        if self.types.insert(name.clone(), (def, features)).is_some() {
            return Err(format!("type {name} declared twice"));
        }
        Ok(())
    }

    /// The struct type of a command's or event's `data`: a named type, or an
    /// implicit struct made from inline members.
    fn implicit(
        &mut self,
        owner: &str,
        what: &str,
        data: Option<&Value>,
    ) -> Result<String, String> {
        match data {
            None => Ok(EMPTY.to_string()),
            Some(Value::String(name)) => Ok(name.clone()),
            Some(inline) => {
                let name = format!("q_obj_{owner}-{what}");
                let members = members_of(Some(inline))?;
                self.types
                    .insert(name.clone(), (TypeDef::Struct { members }, vec![]));
                Ok(name)
            }
        }
    }

    fn struct_members(&self, name: &str) -> Result<Vec<Member>, String> {
        match self.types.get(name) {
            Some((TypeDef::Struct { members }, _)) => Ok(members.clone()),
            _ => Err(format!("base {name} is not a struct declared earlier")),
        }
    }

    /// Looks a named (non-builtin, non-array) type up.
    pub fn get(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name).map(|(def, _)| def)
    }

    /// Checks that every referenced type exists.
    fn check(&self) -> Result<(), String> {
        let check_ty = |ty: &str| -> Result<(), String> {
            let mut ty = ty;
            while let Some(elem) = array_element(ty) {
                ty = elem;
            }
            if is_builtin(ty) || self.types.contains_key(ty) {
                Ok(())
            } else {
                Err(format!("unknown type {ty}"))
            }
        };
        for (def, _) in self.types.values() {
            match def {
                TypeDef::Enum { .. } => {}
                TypeDef::Struct { members } => {
                    members.iter().try_for_each(|m| check_ty(&m.ty))?;
                }
                TypeDef::Union { base, variants, .. } => {
                    base.iter().try_for_each(|m| check_ty(&m.ty))?;
                    variants.iter().try_for_each(|(_, t)| check_ty(t))?;
                }
                TypeDef::Alternate { branches } => {
                    branches.iter().try_for_each(|(_, t)| check_ty(t))?;
                }
            }
        }
        for cmd in self.commands.values() {
            check_ty(&cmd.arg_type)?;
            if let Some(ret) = &cmd.ret_type {
                check_ty(ret)?;
            }
        }
        for ev in self.events.values() {
            check_ty(&ev.arg_type)?;
        }
        Ok(())
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn enum_value(v: &Value) -> Result<EnumValue, String> {
    match v {
        Value::String(name) => Ok(EnumValue {
            name: name.clone(),
            features: vec![],
        }),
        Value::Object(o) => Ok(EnumValue {
            name: o
                .get("name")
                .and_then(Value::as_str)
                .ok_or("enum value without name")?
                .to_string(),
            features: string_list(o.get("features")),
        }),
        _ => Err(format!("bad enum value {v}")),
    }
}

fn members_of(data: Option<&Value>) -> Result<Vec<Member>, String> {
    let Some(data) = data else { return Ok(vec![]) };
    let obj = data.as_object().ok_or("members must be an object")?;
    obj.iter()
        .map(|(key, spec)| {
            let (name, optional) = match key.strip_prefix('*') {
                Some(name) => (name.to_string(), true),
                None => (key.clone(), false),
            };
            let (ty, features) = match spec {
                Value::String(ty) => (ty.clone(), vec![]),
                Value::Object(o) => (
                    o.get("type")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("member {key} without type"))?
                        .to_string(),
                    string_list(o.get("features")),
                ),
                _ => return Err(format!("bad member {key}")),
            };
            Ok(Member {
                name,
                ty,
                optional,
                features,
            })
        })
        .collect()
}

fn branch_list(data: Option<&Value>) -> Result<Vec<(String, String)>, String> {
    let obj = data
        .and_then(Value::as_object)
        .ok_or("branches must be an object")?;
    obj.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|t| (k.clone(), t.to_string()))
                .ok_or_else(|| format!("branch {k} must name a type"))
        })
        .collect()
}
