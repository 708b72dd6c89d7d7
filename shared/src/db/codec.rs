//! Columns that hold a domain name (status, kind, queue, plan) are TEXT and
//! decode straight into the domain enum: a row with a name this version
//! does not know fails to decode ([`super::StoreError::Corrupt`]) instead of
//! being read as some default. Binding an enum writes its name.

use crate::domain::{JobStatus, JobType, OutputStatus, Plan, WorkQueue};
use sqlx::any::{Any, AnyTypeInfo};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::{Database, Decode, Encode, Type};

macro_rules! text_column {
    ($($t:ty),* $(,)?) => {$(
        impl Type<Any> for $t {
            fn type_info() -> AnyTypeInfo {
                <str as Type<Any>>::type_info()
            }

            fn compatible(ty: &AnyTypeInfo) -> bool {
                <str as Type<Any>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Any> for $t {
            fn decode(value: <Any as Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
                let s = <String as Decode<'r, Any>>::decode(value)?;
                Ok(<$t>::try_from(s)?)
            }
        }

        impl<'q> Encode<'q, Any> for $t {
            fn encode_by_ref(
                &self,
                buf: &mut <Any as Database>::ArgumentBuffer<'q>,
            ) -> Result<IsNull, BoxDynError> {
                <&'q str as Encode<'q, Any>>::encode(self.as_str(), buf)
            }
        }
    )*};
}

text_column!(JobStatus, OutputStatus, JobType, WorkQueue, Plan);
