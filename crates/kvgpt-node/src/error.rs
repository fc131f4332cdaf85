//! The one mapping from core errors to JavaScript: the message is prefixed with the stable
//! code (`KVGPT_OPTION_RANGE: temperature must be ...`), which the TypeScript layer turns into
//! `err.code` and the right Error subclass.

pub fn to_napi(e: kvgpt::Error) -> napi::Error {
    napi::Error::from_reason(format!("{}: {}", e.code(), e))
}


pub trait IntoNapi<T> {
    fn napi(self) -> napi::Result<T>;
}

impl<T> IntoNapi<T> for kvgpt::Result<T> {
    fn napi(self) -> napi::Result<T> {
        self.map_err(to_napi)
    }
}
