//! Checks client input against the schema, as QEMU's QObject input visitor does.
//!
//! The visitor walks a value and the type it should have side by side, in the
//! schema's member order, and stops at the first problem with QEMU's message
//! for it. Its output is the same value in canonical form: in keyval mode (the
//! command line) every scalar arrives as a string and is converted to its type;
//! unsigned integers given as negative numbers wrap as QEMU's do. Handlers then
//! deserialize the output into typed structs and never see malformed input.

use crate::error::QmpError;
use crate::keyval;
use crate::schema::{self, Member, Schema, TypeDef};
use serde_json::{Map, Number, Value};

/// Where the input came from, which decides how scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QMP or a JSON command-line value: scalars must have their JSON type.
    Json,
    /// A keyval command-line value: every scalar is a string to convert.
    Keyval,
}

/// Validates a command's `arguments` (absent means `{}`).
pub fn command_args(cmd: &schema::Command, args: Option<&Value>) -> Result<Value, QmpError> {
    let empty = Value::Object(Map::new());
    visit(&cmd.arg_type, args.unwrap_or(&empty), Mode::Json).map_err(QmpError::generic)
}

/// Validates `value` as the schema type `ty`.
pub fn visit(ty: &str, value: &Value, mode: Mode) -> Result<Value, String> {
    let mut v = Visitor {
        schema: schema::schema(),
        keyval: mode == Mode::Keyval,
        path: Vec::new(),
    };
    v.value(ty, value, None)
}

enum Seg {
    Name(String),
    Index(usize),
}

struct Visitor<'s> {
    schema: &'s Schema,
    keyval: bool,
    /// The containers above the value being visited.
    path: Vec<Seg>,
}

impl Visitor<'_> {
    /// The dotted name QEMU prints: `a.b`, `actions[0].data.name` (`actions.0.data.name`
    /// from keyval input).
    fn full_name(&self, name: Option<&str>) -> String {
        let mut out = String::new();
        for seg in &self.path {
            match seg {
                Seg::Name(n) if n.is_empty() => {}
                Seg::Name(n) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(n);
                }
                // The keyval visitor names list elements as keyval spells them.
                Seg::Index(i) if self.keyval => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(&i.to_string());
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if let Some(name) = name {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(name);
        }
        out
    }

    fn type_error(&self, name: Option<&str>, expected: &str) -> String {
        format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full_name_or_null(name)
        )
    }

    /// QEMU names a list element `null` when it has no name of its own.
    fn full_name_or_null(&self, name: Option<&str>) -> String {
        let full = self.full_name(name);
        if full.is_empty() {
            "null".to_string()
        } else {
            full
        }
    }

    fn value(&mut self, ty: &str, value: &Value, name: Option<&str>) -> Result<Value, String> {
        if let Some(elem) = schema::array_element(ty) {
            return self.array(elem, value, name);
        }
        if schema::is_builtin(ty) {
            return self.scalar(ty, value, name);
        }
        let def = self
            .schema
            .get(ty)
            .ok_or_else(|| format!("internal error: unknown type {ty}"))?;
        match def {
            TypeDef::Enum { values } => {
                let text = self.string(value, name)?;
                if values.iter().any(|v| v.name == text) {
                    Ok(Value::String(text))
                } else {
                    Err(format!(
                        "Parameter '{}' does not accept value '{text}'",
                        name.unwrap_or("null")
                    ))
                }
            }
            TypeDef::Struct { members } => {
                let obj = self.object(value, name)?;
                let mut out = Map::new();
                self.enter(name);
                let result = self
                    .members(members, obj, &mut out)
                    .and_then(|()| self.check_unexpected(obj, &out));
                self.leave(name);
                result.map(|()| Value::Object(out))
            }
            TypeDef::Union {
                base,
                discriminator,
                variants,
            } => {
                let obj = self.object(value, name)?;
                let mut out = Map::new();
                self.enter(name);
                let result = self.union(base, discriminator, variants, obj, &mut out);
                self.leave(name);
                result.map(|()| Value::Object(out))
            }
            TypeDef::Alternate { branches } => self.alternate(ty, branches, value, name),
        }
    }

    fn enter(&mut self, name: Option<&str>) {
        self.path
            .push(Seg::Name(name.unwrap_or_default().to_string()));
    }

    fn leave(&mut self, _name: Option<&str>) {
        self.path.pop();
    }

    fn object<'v>(
        &self,
        value: &'v Value,
        name: Option<&str>,
    ) -> Result<&'v Map<String, Value>, String> {
        value
            .as_object()
            .ok_or_else(|| self.type_error(name, "object"))
    }

    fn members(
        &mut self,
        members: &[Member],
        obj: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        for m in members {
            match obj.get(&m.name) {
                Some(v) => {
                    let canon = self.value(&m.ty, v, Some(&m.name))?;
                    out.insert(m.name.clone(), canon);
                }
                None if m.optional => {}
                None => {
                    return Err(format!(
                        "Parameter '{}' is missing",
                        self.full_name(Some(&m.name))
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_unexpected(
        &self,
        obj: &Map<String, Value>,
        visited: &Map<String, Value>,
    ) -> Result<(), String> {
        let Some((key, v)) = obj.iter().find(|(k, _)| !visited.contains_key(*k)) else {
            return Ok(());
        };
        if self.keyval && (v.is_object() || v.is_array()) {
            Err(format!(
                "Parameters '{}.*' are unexpected",
                self.full_name(Some(key))
            ))
        } else {
            Err(format!(
                "Parameter '{}' is unexpected",
                self.full_name(Some(key))
            ))
        }
    }

    fn union(
        &mut self,
        base: &[Member],
        discriminator: &str,
        variants: &[(String, String)],
        obj: &Map<String, Value>,
        out: &mut Map<String, Value>,
    ) -> Result<(), String> {
        self.members(base, obj, out)?;
        let tag = out
            .get(discriminator)
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some((_, branch)) = variants.iter().find(|(case, _)| case == tag) {
            match self.schema.get(branch) {
                Some(TypeDef::Struct { members }) => self.members(members, obj, out)?,
                Some(TypeDef::Union {
                    base,
                    discriminator,
                    variants,
                }) => return self.union(base, discriminator, variants, obj, out),
                _ => {
                    return Err(format!(
                        "internal error: union branch {branch} is not a struct"
                    ))
                }
            }
        }
        self.check_unexpected(obj, out)
    }

    fn alternate(
        &mut self,
        ty: &str,
        branches: &[(String, String)],
        value: &Value,
        name: Option<&str>,
    ) -> Result<Value, String> {
        let schema = self.schema;
        let is_object_type = |t: &str| {
            matches!(
                schema.get(t),
                Some(TypeDef::Struct { .. } | TypeDef::Union { .. })
            )
        };
        let is_string_type =
            |t: &str| t == "str" || matches!(schema.get(t), Some(TypeDef::Enum { .. }));
        let pick = |pred: &dyn Fn(&str) -> bool| {
            branches.iter().map(|(_, t)| t.as_str()).find(|t| pred(t))
        };
        let branch = match value {
            Value::Object(_) => pick(&is_object_type),
            Value::String(_) if self.keyval => pick(&is_string_type)
                .or_else(|| pick(&|t: &str| schema::is_builtin(t) && t != "any")),
            Value::String(_) => pick(&is_string_type),
            Value::Bool(_) => pick(&|t: &str| t == "bool"),
            Value::Null => pick(&|t: &str| t == "null"),
            Value::Number(n) if n.is_f64() => pick(&|t: &str| t == "number"),
            Value::Number(_) => {
                pick(&|t: &str| is_int_type(t)).or_else(|| pick(&|t: &str| t == "number"))
            }
            Value::Array(_) => pick(&|t: &str| schema::array_element(t).is_some()),
        };
        match branch {
            Some(t) => self.value(t, value, name),
            None => Err(self.type_error(name, ty)),
        }
    }

    fn array(&mut self, elem: &str, value: &Value, name: Option<&str>) -> Result<Value, String> {
        let items = value
            .as_array()
            .ok_or_else(|| self.type_error(name, "array"))?;
        self.enter(name);
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            self.path.push(Seg::Index(i));
            let r = self.value(elem, item, None);
            self.path.pop();
            match r {
                Ok(v) => out.push(v),
                Err(e) => {
                    self.leave(name);
                    return Err(e);
                }
            }
        }
        self.leave(name);
        Ok(Value::Array(out))
    }

    /// A string member: in keyval mode, anything else is a shape error.
    fn string(&self, value: &Value, name: Option<&str>) -> Result<String, String> {
        match value {
            Value::String(s) => Ok(s.clone()),
            Value::Object(_) | Value::Array(_) if self.keyval => Err(format!(
                "Parameters '{}.*' are unexpected",
                self.full_name_or_null(name)
            )),
            _ => Err(self.type_error(name, "string")),
        }
    }

    fn scalar(&mut self, ty: &str, value: &Value, name: Option<&str>) -> Result<Value, String> {
        if ty == "any" {
            return Ok(value.clone());
        }
        if self.keyval {
            let text = self.string(value, name)?;
            return self.keyval_scalar(ty, &text, name);
        }
        let bare = name.unwrap_or("null");
        match ty {
            "str" => self.string(value, name).map(Value::String),
            "bool" if value.is_boolean() => Ok(value.clone()),
            "bool" => Err(self.type_error(name, "boolean")),
            "null" if value.is_null() => Ok(Value::Null),
            "null" => Err(self.type_error(name, "null")),
            "number" if value.is_number() => Ok(value.clone()),
            "number" => Err(self.type_error(name, "number")),
            "int" | "int64" | "int8" | "int16" | "int32" => {
                let n = value
                    .as_i64()
                    .ok_or_else(|| self.type_error(name, "integer"))?;
                check_signed(ty, n, bare)
            }
            _ => {
                // uint8..uint64 and size: QEMU takes any integer, negative ones wrapping.
                let n = match value {
                    Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
                    _ => None,
                }
                .ok_or_else(|| {
                    format!(
                        "Parameter '{}' expects uint64",
                        self.full_name_or_null(name)
                    )
                })?;
                check_unsigned(ty, n, bare)
            }
        }
    }

    fn keyval_scalar(&self, ty: &str, text: &str, name: Option<&str>) -> Result<Value, String> {
        let full = self.full_name_or_null(name);
        let bare = name.unwrap_or("null");
        match ty {
            "str" => Ok(Value::String(text.to_string())),
            "bool" => keyval::parse_bool(text)
                .map(Value::Bool)
                .ok_or_else(|| format!("Parameter '{full}' expects 'on' or 'off'")),
            "null" if text.is_empty() => Ok(Value::Null),
            "null" => Err(format!("Parameter '{full}' expects null")),
            "number" => text
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("Parameter '{full}' expects number")),
            "int" | "int64" | "int8" | "int16" | "int32" => {
                let n = keyval::parse_int(text)
                    .ok_or_else(|| format!("Parameter '{full}' expects integer"))?;
                check_signed(ty, n, bare)
            }
            "size" => keyval::parse_size(text)
                .map(Value::from)
                .map_err(|_| format!("Parameter '{full}' expects a size value")),
            _ => {
                let n = keyval::parse_uint(text)
                    .ok_or_else(|| format!("Parameter '{full}' expects integer"))?;
                check_unsigned(ty, n, bare)
            }
        }
    }
}

fn is_int_type(t: &str) -> bool {
    matches!(
        t,
        "int"
            | "int8"
            | "int16"
            | "int32"
            | "int64"
            | "uint8"
            | "uint16"
            | "uint32"
            | "uint64"
            | "size"
    )
}

fn check_signed(ty: &str, n: i64, bare: &str) -> Result<Value, String> {
    let (min, max, cname) = match ty {
        "int8" => (i64::from(i8::MIN), i64::from(i8::MAX), "int8_t"),
        "int16" => (i64::from(i16::MIN), i64::from(i16::MAX), "int16_t"),
        "int32" => (i64::from(i32::MIN), i64::from(i32::MAX), "int32_t"),
        _ => return Ok(Value::from(n)),
    };
    if n < min || n > max {
        return Err(format!("Parameter '{bare}' expects {cname}"));
    }
    Ok(Value::from(n))
}

fn check_unsigned(ty: &str, n: u64, bare: &str) -> Result<Value, String> {
    let (max, cname) = match ty {
        "uint8" => (u64::from(u8::MAX), "uint8_t"),
        "uint16" => (u64::from(u16::MAX), "uint16_t"),
        "uint32" => (u64::from(u32::MAX), "uint32_t"),
        _ => return Ok(Value::from(n)),
    };
    if n > max {
        return Err(format!("Parameter '{bare}' expects {cname}"));
    }
    Ok(Value::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(args: Value) -> Result<Value, String> {
        visit("BlockdevOptions", &args, Mode::Json)
    }

    fn add_kv(args: Value) -> Result<Value, String> {
        visit("BlockdevOptions", &args, Mode::Keyval)
    }

    #[test]
    fn missing_discriminator_is_reported() {
        assert_eq!(
            add(json!({"node-name": "n"})).unwrap_err(),
            "Parameter 'driver' is missing"
        );
    }

    #[test]
    fn unknown_enum_value_names_the_bare_member() {
        let err = add(json!({"driver": "raw", "node-name": "n", "file": {"driver": "nope"}}))
            .unwrap_err();
        assert_eq!(err, "Parameter 'driver' does not accept value 'nope'");
    }

    #[test]
    fn missing_member_of_nested_union_uses_the_dotted_path() {
        let err = add(json!({"driver": "raw", "file": {"driver": "file"}})).unwrap_err();
        assert_eq!(err, "Parameter 'file.filename' is missing");
    }

    #[test]
    fn alternate_of_wrong_json_type_names_the_alternate() {
        let err = add(json!({"driver": "raw", "node-name": "n", "file": 3})).unwrap_err();
        assert_eq!(
            err,
            "Invalid parameter type for 'file', expected: BlockdevRef"
        );
    }

    #[test]
    fn nested_struct_errors_use_the_dotted_path() {
        let err = add(json!({"driver": "null-co", "cache": {"direct": 1}})).unwrap_err();
        assert_eq!(
            err,
            "Invalid parameter type for 'cache.direct', expected: boolean"
        );
        let err = add(json!({"driver": "null-co", "cache": {"foo": 1}})).unwrap_err();
        assert_eq!(err, "Parameter 'cache.foo' is unexpected");
    }

    #[test]
    fn int_member_rejects_strings_and_floats() {
        let err = add(json!({"driver": "null-co", "size": "x"})).unwrap_err();
        assert_eq!(err, "Invalid parameter type for 'size', expected: integer");
        let err = add(json!({"driver": "null-co", "size": 1.5})).unwrap_err();
        assert_eq!(err, "Invalid parameter type for 'size', expected: integer");
    }

    #[test]
    fn uint64_member_wraps_negative_numbers_and_rejects_others() {
        let ok = add(json!({"driver": "null-co", "latency-ns": -1})).unwrap();
        assert_eq!(ok["latency-ns"], json!(u64::MAX));
        let err = add(json!({"driver": "null-co", "latency-ns": 1.5})).unwrap_err();
        assert_eq!(err, "Parameter 'latency-ns' expects uint64");
    }

    #[test]
    fn keyval_scalars_are_converted_to_their_types() {
        let out =
            add_kv(json!({"driver": "null-co", "size": "0x10", "read-zeroes": "on"})).unwrap();
        assert_eq!(
            out,
            json!({"driver": "null-co", "size": 16, "read-zeroes": true})
        );
    }

    #[test]
    fn keyval_errors_use_qemus_wording() {
        let err = add_kv(json!({"driver": "null-co", "read-zeroes": "x"})).unwrap_err();
        assert_eq!(err, "Parameter 'read-zeroes' expects 'on' or 'off'");
        let err = add_kv(json!({"driver": "null-co", "size": "1k"})).unwrap_err();
        assert_eq!(err, "Parameter 'size' expects integer");
        let err = add_kv(json!({"driver": "null-co", "size": {"a": "1"}})).unwrap_err();
        assert_eq!(err, "Parameters 'size.*' are unexpected");
        let err = add_kv(json!({"driver": "null-co", "cache": "x"})).unwrap_err();
        assert_eq!(err, "Invalid parameter type for 'cache', expected: object");
    }

    #[test]
    fn keyval_string_picks_the_reference_branch_of_an_alternate() {
        let out = add_kv(json!({"driver": "raw", "node-name": "r", "file": "f0"})).unwrap();
        assert_eq!(out["file"], json!("f0"));
    }

    #[test]
    fn list_elements_are_named_null_for_enum_errors() {
        let cmd = &crate::schema::schema().commands["qmp_capabilities"];
        let err = command_args(cmd, Some(&json!({"enable": ["foo"]}))).unwrap_err();
        assert_eq!(err.desc, "Parameter 'null' does not accept value 'foo'");
    }

    #[test]
    fn absent_arguments_mean_an_empty_object() {
        let cmd = &crate::schema::schema().commands["job-pause"];
        let err = command_args(cmd, None).unwrap_err();
        assert_eq!(err.desc, "Parameter 'id' is missing");
    }

    #[test]
    fn introspection_lists_every_declared_command() {
        let schema = crate::schema::schema();
        let info = crate::introspect::query_qmp_schema(schema);
        let commands = info
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .count();
        assert_eq!(commands, schema.commands.len());
    }
}
